"""Where a model's weights come from and how one process builds its part of it: Hub, local
directory or .gguf sources, conversion to safetensors, content hashes, checkpoint reads by tensor
or slice, and the loaders (empty skeleton, replica, config, tokenizer)."""
