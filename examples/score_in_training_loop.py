"""Score a Megatron-Core GPT in the middle of training (megatron.core only, no Megatron-LM).

    torchrun --nproc-per-node 2 examples/score_in_training_loop.py --tp 2 --prune-score-out /tmp/scores

A tiny GPT is trained for ``--train-steps`` steps on random tokens; after ``--score-at`` steps
the model is switched to eval mode and scored on ``--calib-batches`` batches with a few lines
(marked SCORING below), then training continues. The activation logs feed
``megatron-prune plan --logs /tmp/scores ...``. Runs on CPU (gloo) or GPU (NCCL); run with
``--nproc-per-node`` equal to ``--tp`` (this example does no data-parallel gradient sync).
"""

import argparse
import os

import torch
import torch.distributed as dist


def build_model(tp: int):
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    torch.manual_seed(1234)
    config = TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        gated_linear_unit=True, activation_func=torch.nn.functional.silu, normalization="RMSNorm",
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, bias_activation_fusion=False,
        masked_softmax_fusion=False, bias_dropout_fusion=False, apply_rope_fusion=False,
        gradient_accumulation_fusion=False, tensor_model_parallel_size=tp,
        use_cpu_initialization=not torch.cuda.is_available(), pipeline_dtype=torch.float32,
    )
    model = GPTModel(config=config, transformer_layer_spec=get_gpt_layer_local_spec(normalization="RMSNorm"),
                     vocab_size=128, max_sequence_length=64, position_embedding_type="rope")
    return model.cuda() if torch.cuda.is_available() else model


def main() -> None:
    from megatron_prune.integration import add_prune_args, scoring_enabled, session_from_args
    from megatron_prune.scoring.runner import forward_only

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--score-at", type=int, default=2)
    parser.add_argument("--calib-batches", type=int, default=3)
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    args = add_prune_args(parser).parse_args()

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if not torch.cuda.is_available():  # megatron.core's CUDA-only spots, patched for CPU runs
        from megatron_prune.testing.megatron_cpu import apply_cpu_workarounds

        apply_cpu_workarounds()
    model = build_model(args.tp)
    device = next(model.parameters()).device
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    s, b = args.seq_length, args.micro_batch_size
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool, device=device), 1)[None, None]
    pos = torch.arange(s, device=device)[None].expand(b, s)
    gen = torch.Generator().manual_seed(0)  # same tokens on every rank

    for step in range(1, args.train_steps + 1):
        tokens = torch.randint(0, 128, (b, s + 1), generator=gen).to(device)
        model.train()
        loss = model(tokens[:, :-1], pos, mask, labels=tokens[:, 1:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if dist.get_rank() == 0:
            print(f"step {step}: loss {loss.item():.4f}")

        if step == args.score_at and scoring_enabled(args):
            # ---- SCORING: a few lines in the training loop --------------------------------
            model.eval()
            with session_from_args(args, [model]) as session:
                for _ in range(args.calib_batches):
                    calib = torch.randint(0, 128, (b, s), generator=gen)
                    forward_only([model], calib, micro_batch_size=b)
                    session.step(tokens=calib.numel())
                session.finalize(args.prune_score_out)
            # hooks are removed here; training continues unobserved
            # ----------------------------------------------------------------------------
            if dist.get_rank() == 0:
                print(f"scored {session.tokens} tokens at step {step}; logs in {args.prune_score_out}")

    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
