"""Python tiktoken's side of `gauge-bench tokenizer`: encodes the same chunks as
tiktoken-rs and prints one JSON line with the token count and timings.

tiktoken downloads its encoding files on first use; this machine may have no
internet, so the bench hands over the ranks (dumped from tiktoken-rs) as a
pre-filled tiktoken cache. tiktoken checks their SHA-256 against OpenAI's, so the
encoding used here is tiktoken's own definition (ranks, pattern, special tokens),
not a copy of Gauge's.

usage: tokenizer.py ENCODING RANKS_FILE CHUNKS_JSON REPEATS
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

URLS = {
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
}


def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> int:
    name, ranks, chunks_path, repeats = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    try:
        import tiktoken
        import tiktoken.load
    except ImportError:
        print("python3 has no tiktoken: run `cargo xtask setup` or `python3 -m pip install tiktoken==0.14.0`", file=sys.stderr)
        return 2

    # tiktoken looks its files up in the cache under the SHA-1 of their URL.
    cache = tempfile.mkdtemp(prefix="gauge-tiktoken-")
    os.environ["TIKTOKEN_CACHE_DIR"] = cache
    shutil.copyfile(ranks, os.path.join(cache, hashlib.sha1(URLS[name].encode()).hexdigest()))

    # A hash mismatch makes tiktoken fall back to downloading: fail at once instead.
    def no_download(path):
        raise RuntimeError(f"tiktoken rejected the ranks handed over for {name} (SHA-256 mismatch) and wanted to download {path}")

    tiktoken.load.read_file = no_download

    with open(chunks_path, encoding="utf-8") as f:
        chunks = json.load(f)

    rss_before = vm_rss()
    start = time.perf_counter()
    try:
        enc = tiktoken.get_encoding(name)
    except RuntimeError as e:
        print(e, file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    enc.encode_ordinary("hello")  # as Rust's load, the first encode included
    load_seconds = time.perf_counter() - start
    load_rss = vm_rss() - rss_before

    # One untimed pass, as on the Rust side, then the timed ones: one chunk at a
    # time, on one thread, as Gauge counts a prompt.
    tokens = sum(len(enc.encode_ordinary(c)) for c in chunks)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        n = 0
        for c in chunks:
            n += len(enc.encode_ordinary(c))
        seconds.append(time.perf_counter() - start)
        if n != tokens:
            raise RuntimeError(f"{name}: {n} tokens on a repeat, {tokens} on the first pass")

    print(json.dumps({"tokens": tokens, "seconds": seconds, "load_seconds": load_seconds, "load_rss": load_rss, "version": tiktoken.__version__}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
