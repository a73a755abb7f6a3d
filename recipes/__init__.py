"""Built-in YAML recipes (and the embedded demo model) shipped as package data."""

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent
