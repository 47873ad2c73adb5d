"""Run the encode and decode stages once each, for `nsys profile --trace=cuda,nvtx` (NVTX ranges
memcomp/encode, memcomp/pool, memcomp/generate). Random weights of the named shape.

    nsys profile --trace=cuda,nvtx -o encode_decode python bench/profile_stages.py --model-config qwen2.5-7b
"""

import argparse

import torch

from memcomp import CompressorConfig, MemoryCompressor
from memcomp.model_configs import MODEL_CONFIGS, IdTokenizer, random_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-config", default="qwen2.5-7b", choices=sorted(MODEL_CONFIGS))
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--chunk-size", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=16)
    args = p.parse_args()
    cuda = torch.cuda.is_available()
    model = random_model(args.model_config, device="cuda" if cuda else "cpu",
                         dtype=torch.bfloat16 if cuda else torch.float32)
    comp = MemoryCompressor.from_base(model, IdTokenizer(model.config.vocab_size),
                                      CompressorConfig(chunk_size=args.chunk_size))
    ids = torch.randint(0, model.config.vocab_size - 2, (args.tokens,))
    for _ in range(2):  # the second iteration is the one to read in the timeline
        mem = comp.encode(ids)
        prompt = torch.randint(0, model.config.vocab_size - 2, (32,))
        comp.model.generate(**{k: v for k, v in comp.build_decoder_inputs([mem.embeddings], [prompt])
                                  .model_kwargs().items() if k != "position_ids"},
                            max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
        if cuda:
            torch.cuda.synchronize()
    print(f"encoded {args.tokens} tokens into {mem.n_chunks} memory embeddings, decoded {args.new_tokens} tokens")


if __name__ == "__main__":
    main()
