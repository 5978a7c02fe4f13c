"""``python -m trainer.gguf_load_check FILE.gguf``: load a GGUF in llama.cpp and print ``LOAD_OK <n_vocab>``.

Run by the verifier (``trainer.verify``) in a child process of its own: a file llama.cpp cannot
read may crash the loader natively, which must end that child, not the export. It loads the file
the way every other llama.cpp user of the project does (no extra buffer types:
``loop.core.gguf_model.without_extra_buffer_types``), but with llama.cpp's own log on, which says
why a file fails.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from llama_cpp import Llama

    from loop.core.gguf_model import without_extra_buffer_types

    without_extra_buffer_types()
    args = sys.argv[1:] if argv is None else argv
    llm = Llama(model_path=args[0], n_ctx=64, n_gpu_layers=0, verbose=True)
    print("LOAD_OK", llm.n_vocab())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
