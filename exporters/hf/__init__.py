"""Hugging Face import (source.py), validation against transformers (reference.py), convert."""
