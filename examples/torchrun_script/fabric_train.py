"""A Lightning Fabric script as Fabric's docs launch it with torchrun
(https://lightning.ai/docs/fabric/stable/guide/multi_node/other.html):

    torchrun --nnodes 2 --nproc-per-node 1 fabric_train.py --num-nodes 2 --devices 1
    trainctl run -- torchrun --nnodes 2 --nproc-per-node 1 fabric_train.py --num-nodes 2 --devices 1

Fabric sees torchrun's environment (TORCHELASTIC_RUN_ID, RANK, WORLD_SIZE, MASTER_*), which a
trainctl rank has too, and joins the process group from it. Needs `pip install lightning-fabric`.
"""

import argparse
import os

import torch
import torch.nn.functional as F
from lightning_fabric import Fabric
from torch.utils.data import DataLoader, TensorDataset


def main(args):
    fabric = Fabric(accelerator="cuda" if torch.cuda.is_available() else "cpu", devices=args.devices,
                    num_nodes=args.num_nodes, strategy="ddp")
    fabric.launch()
    fabric.seed_everything(0)
    x = torch.rand(256, 20)
    dataset = TensorDataset(x, x.sum(dim=1, keepdim=True))
    model = torch.nn.Linear(20, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    loader = fabric.setup_dataloaders(DataLoader(dataset, batch_size=32, shuffle=True))

    state = {"model": model, "optimizer": optimizer, "epoch": 0}
    if args.checkpoint and os.path.exists(args.checkpoint):
        fabric.load(args.checkpoint, state)
        fabric.print(f"resumed at epoch {state['epoch']}")
    for epoch in range(state["epoch"], args.epochs):
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = F.mse_loss(model(inputs), targets)
            fabric.backward(loss)
            optimizer.step()
        state["epoch"] = epoch + 1
        if args.checkpoint:
            fabric.save(args.checkpoint, state)
        fabric.print(f"epoch {epoch} loss {loss.item():.4f} world_size {fabric.world_size}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--checkpoint", default=None, help="where to save and resume from (fabric.save/load)")
    main(parser.parse_args())
