"""Plugins for training frameworks: ``mtckpt.integrations.lightning`` (PyTorch Lightning) and
``mtckpt.integrations.transformers`` (Hugging Face Trainer). Each imports its framework."""
