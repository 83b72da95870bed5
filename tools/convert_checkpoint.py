"""Convert between a Hugging Face checkpoint directory and a megatron-archer distributed checkpoint.

    python tools/convert_checkpoint.py hf-to-megatron --hf HF_DIR --out MG_DIR [--tp N --pp N]
    python tools/convert_checkpoint.py megatron-to-hf --megatron MG_DIR --out HF_DIR \
        [--tp N --pp N] [--max-shard-size 5GB] [--dtype bf16|fp16|fp32] [--force]
    torchrun --nproc-per-node 2 tools/convert_checkpoint.py hf-to-megatron ... --tp 2

The logic is ``megatron_archer.models.convert``. It is imported under the ``__main__`` guard:
megatron's checkpoint writer starts a spawned helper process, which re-imports this file.
"""

if __name__ == "__main__":
    from megatron_archer.models.convert import main

    main()
