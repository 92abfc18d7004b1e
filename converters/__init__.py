"""Checkpoint converters: Hugging Face MedGemma (Gemma 3) → GGUF for llama.cpp."""
