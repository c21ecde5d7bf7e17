"""lsdc: lumbar spine degeneration grading from MRI (RSNA 2024 LSDC format)."""

__version__ = "0.1.0"
