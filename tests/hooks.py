"""Worker set-up hooks for tests (Ray imports them by name in each worker process)."""


def forbid_tokenizing():
    """Make every tokenizer entry point raise in this process."""
    import tokenizers
    import transformers

    def refuse(*args, **kwargs):
        raise RuntimeError("a training worker called the tokenizer")
    for name in ("encode", "encode_batch", "from_file", "from_str"):
        setattr(tokenizers.Tokenizer, name, refuse)
    for name in ("__call__", "encode", "batch_encode_plus", "_batch_encode_plus", "_encode_plus", "from_pretrained"):
        setattr(transformers.PreTrainedTokenizerBase, name, refuse)
    transformers.AutoTokenizer.from_pretrained = refuse
