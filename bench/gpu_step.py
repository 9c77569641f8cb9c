"""The bare masked-LM step on a GPU: what a bf16 step of the pretrain stage's 4x256 BERT
costs with no batch preparation, eagerly and under torch.compile, on one fixed batch
shape. Read against bench/train.py's in-loop figures, the gap is host-side batch work.

    python -m bench.gpu_step        (needs a CUDA GPU)
"""

from __future__ import annotations

import time

import torch
from torch.nn import functional as F

from tlpipe.params import EncoderConfig
from tlpipe.settings.text_classification.model import bert_config, mlm_head, new_mlm

LENGTH = 48
STEPS, WARMUP = 60, 20


def main() -> None:
    device = torch.device("cuda")
    for batch in (32, 256):
        for mode in ("eager", "compile"):
            torch.manual_seed(0)
            model = new_mlm(bert_config(EncoderConfig(), 8000, 0, 128)).to(device)
            encoder, head = mlm_head(model)
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
            masked = int(batch * LENGTH * 0.15)

            def step(
                ids: torch.Tensor,
                mask: torch.Tensor,
                pos: torch.Tensor,
                tgt: torch.Tensor,
                encoder: torch.nn.Module = encoder,
                head: torch.nn.Module = head,
            ) -> None:
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    hidden = encoder(input_ids=ids, attention_mask=mask).last_hidden_state
                    logits = head(hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos))
                F.cross_entropy(logits.float(), tgt).backward()

            fn = step if mode == "eager" else torch.compile(step)
            ids = torch.randint(5, 8000, (batch, LENGTH), device=device)
            mask = torch.ones_like(ids)
            pos = torch.randperm(batch * LENGTH, device=device)[:masked]
            tgt = torch.randint(5, 8000, (masked,), device=device)
            for i in range(STEPS):
                if i == WARMUP:
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                fn(ids, mask, pos, tgt)
                optimizer.step()
                optimizer.zero_grad(set_to_none=False)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / (STEPS - WARMUP)
            print(
                f"batch {batch} {mode}: {seconds * 1e3:.2f} ms/step, {batch * LENGTH / seconds:,.0f} tokens/s"
            )


if __name__ == "__main__":
    main()
