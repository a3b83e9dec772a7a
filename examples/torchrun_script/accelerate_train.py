"""An HF Accelerate script in Accelerate's own style, launched with torchrun as Accelerate's
docs allow (https://huggingface.co/docs/accelerate/basic_tutorials/launch):

    torchrun --nnodes 2 --nproc-per-node 1 accelerate_train.py --epochs 3   (on each node)
    trainctl run -- torchrun --nnodes 2 --nproc-per-node 1 accelerate_train.py --epochs 3

Accelerator() reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*), which a
trainctl rank has too, and joins the process group from it (gloo on CPU, nccl on GPUs).
save_state/load_state keep model, optimizer and data-loader state in --checkpoint, so a
restarted job resumes. Synthetic data, no download. Needs `pip install accelerate`.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset


def main(args):
    # as Accelerate's own examples do (`--cpu`): on a machine without GPUs, say so, or
    # Accelerate leaves torchrun's processes unconnected (DistributedType.NO)
    accelerator = Accelerator(cpu=args.cpu or not torch.cuda.is_available())
    torch.manual_seed(0)
    x = torch.rand(256, 20)
    dataset = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    loader = DataLoader(dataset, batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)

    start = 0
    if args.checkpoint and os.path.isdir(args.checkpoint):
        accelerator.load_state(args.checkpoint)
        with open(os.path.join(args.checkpoint, "epoch.txt")) as f:
            start = int(f.read())
        accelerator.print(f"resumed at epoch {start}")
    for epoch in range(start, args.epochs):
        model.train()
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = F.mse_loss(model(inputs), targets)
            accelerator.backward(loss)
            optimizer.step()
        mean_loss = accelerator.gather(loss.detach()[None]).mean().item()  # every rank's last batch
        if args.checkpoint:
            accelerator.save_state(args.checkpoint)
            if accelerator.is_main_process:
                with open(os.path.join(args.checkpoint, "epoch.txt"), "w") as f:
                    f.write(str(epoch + 1))
        accelerator.print(f"epoch {epoch} loss {mean_loss:.4f} num_processes {accelerator.num_processes} "
                          f"({accelerator.distributed_type})")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--cpu", action="store_true", help="train on the CPU even where there are GPUs")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="a directory to save and resume from (save_state/load_state)")
    main(parser.parse_args())
