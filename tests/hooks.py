"""Worker set-up hooks for tests, and the runtime environment that runs one in every Ray Train worker.

Ray applies a runtime environment's ``worker_process_setup_hook`` only at the job
level (an actor's own is ignored: tried with Ray 2.60), so tests that share one
Ray instance hand their workers a hook through ``tests/worker_site/sitecustomize.py``.
"""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker_hook(name: str, **env: str) -> dict:
    """A runtime environment whose Python processes call ``tests.hooks.<name>`` at start."""
    return {"env_vars": {"PYTHONPATH": f"{ROOT / 'tests' / 'worker_site'}:{ROOT}",
                         "RAYTRAIN_WORKER_HOOK": f"tests.hooks.{name}", **env}}


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


def slow_reads():
    """Every TokenStream.windows call waits RAYTRAIN_READ_DELAY_MS first: a stand-in for a network file system
    where random windows of a large corpus never stay in the page cache (bench/throughput.py --slow-reads)."""
    import os
    import time

    from raytrain.data import TokenStream
    delay, read = float(os.environ["RAYTRAIN_READ_DELAY_MS"]) / 1000, TokenStream.windows

    def slow(self, *args, **kwargs):
        time.sleep(delay)
        return read(self, *args, **kwargs)
    TokenStream.windows = slow
