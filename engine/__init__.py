"""tandem's model runtime: `LLM(model_dir).generate(prompts, SamplingParams(...))`.

Exports are resolved lazily so `engine.tokenizer` can be imported (by the gateway)
without importing torch.
"""

_EXPORTS = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm",
    "SamplingParams": "engine.sampling",
    "RequestOutput": "engine.output",
}

__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
