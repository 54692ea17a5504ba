"""Activation memory that `set_grad_checkpointing()` saves when fine-tuning an encoder.

    python -m benchmarks.grad_checkpointing --models convvit_base_patch16 convvit_large_patch16 --input_size 224

For each model (the fine-tuning classifier: 1000 classes, fc_norm, drop path 0.1, train mode) it counts the bytes
that autograd keeps for the backward of one forward, with and without checkpointing, at two batch sizes; their
difference per image is the activation memory per image (batch-independent tensors cancel out). Counting saved
tensors gives the same figure on any device, so it runs on the CPU; `--amp bf16` counts under bf16 autocast.
"""
import argparse

import timm
import torch

import dmjd_encoders  # noqa: F401  (registers the encoders)


def saved_activation_bytes(model: torch.nn.Module, run) -> tuple:
    """`run()`'s output and the bytes autograd keeps for its backward: every tensor saved for backward, counted once
    per storage, the model's parameters not counted. With checkpointing, a block's inputs are saved and its insides
    are recomputed in the backward, so they are not counted."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[(storage.device, storage.data_ptr())] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = run()
    return out, sum(storages.values())


def per_image_bytes(model: torch.nn.Module, input_size: int, checkpointing: bool, amp_dtype=None,
                    batches=(1, 2)) -> float:
    model.set_grad_checkpointing(checkpointing)
    sizes = []
    for batch in batches:
        x = torch.randn(batch, 3, input_size, input_size)
        with torch.autocast("cpu", dtype=amp_dtype, enabled=amp_dtype is not None):
            out, kept = saved_activation_bytes(model, lambda: model(x))
        del out
        sizes.append(kept)
    return (sizes[1] - sizes[0]) / (batches[1] - batches[0])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="activation memory saved by gradient checkpointing")
    p.add_argument("--models", nargs="+", default=["convvit_base_patch16", "convvit_large_patch16"])
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--drop_path", default=0.1, type=float)
    p.add_argument("--amp", default="none", choices=["none", "bf16"], help="count under bf16 autocast")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(0)
    amp_dtype = torch.bfloat16 if args.amp == "bf16" else None
    print(f"{'bf16 autocast' if amp_dtype else 'fp32'}, {args.input_size} px, fine-tuning classifier in train mode; "
          "MiB of activations kept for backward per image")
    print("| model | without checkpointing | with checkpointing | saved |")
    print("|---|---|---|---|")
    rows = []
    for name in args.models:
        model = timm.create_model(name, img_size=args.input_size, num_classes=1000, fc_norm=True,
                                  drop_path_rate=args.drop_path).train()
        plain = per_image_bytes(model, args.input_size, False, amp_dtype)
        checkpointed = per_image_bytes(model, args.input_size, True, amp_dtype)
        rows.append((name, plain, checkpointed))
        print(f"| {name} | {plain / 2 ** 20:.0f} | {checkpointed / 2 ** 20:.0f} | "
              f"{(plain - checkpointed) / 2 ** 20:.0f} ({100 * (1 - checkpointed / plain):.0f}%) |", flush=True)
        del model
    return rows


if __name__ == "__main__":
    main()
