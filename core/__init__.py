"""The dgguf core, shared by convert and runtime: the error type, the native library and its wrapper, thread
defaults."""
