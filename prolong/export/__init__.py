"""Shipping a trained model: HF safetensors and GGUF files, made and checked with llama.cpp's tools."""
