"""Where a run's inputs come from and how one process builds its part of the model: Hub, local
directory or .gguf sources, conversion to safetensors, content hashes, checkpoint reads by tensor
or slice, the loaders (empty skeleton, replica, config, tokenizer), and the evaluation texts as
documents (corpus.py: the bundled text, a file of lines, or a dataset through 🤗 datasets)."""
