"""Placeholder: public API and PrefillService/DecodeService protos land with the services issue."""
