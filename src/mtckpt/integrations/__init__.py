"""Plugins for training frameworks, public: ``mtckpt.integrations.lightning`` (PyTorch
Lightning) and ``mtckpt.integrations.transformers`` (Hugging Face Trainer). Each imports its
framework; the adapters are in :mod:`mtckpt.adapters`."""
