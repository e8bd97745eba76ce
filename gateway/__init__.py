"""The gateway: what clients touch. An OpenAI-compatible REST shim and a typed gRPC API
over one request pipeline (`core.Gateway`): authenticate, validate, template and
tokenize, admit (bounded concurrency and queue), route (`router`), stream from a decode
instance, and keep request records and sessions in Redis (`state`). It holds no state
another replica needs, and never imports torch.
"""
