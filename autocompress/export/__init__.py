"""Writers that turn a compressed model into files other runtimes load (GGUF for llama.cpp)."""
