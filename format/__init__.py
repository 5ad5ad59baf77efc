"""The GGUF format as dgguf reads and writes it: the reader and writer, the type tables, the architecture's
tensor table."""
