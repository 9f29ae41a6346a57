"""The process group of a Train run: Ray Train's torch backend, kept on the loopback interface when the
cluster is this one machine's.

Ray Train's own setup gives rank 0's address as MASTER_ADDR and lets `init_process_group("env://")` start
the rendezvous store there; torch's TCPStore server listens on every interface (`*:PORT`) whatever host
it is given, and gloo and NCCL pick their interface from the host name. When the node's address is a
loopback one (an embedded cluster: nothing outside this machine can join it anyway), rank 0 binds the
store's socket to 127.0.0.1 itself and hands it to TCPStore (`master_listen_fd`), the others connect to
that port, and gloo and NCCL are told to use the loopback interface. On any other node address the setup
is Ray's own, so a multi-node cluster works as before. Imported only where Ray is installed.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

# The rendezvous store rank 0 serves, from its creation until its process group holds it.
_STORE = None


@dataclass
class LoopbackTorchConfig(TorchConfig):
    """TorchConfig whose process group listens on loopback only when the cluster's node address is one."""

    @property
    def backend_cls(self):
        return _LoopbackTorchBackend


class _LoopbackTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: TorchConfig):
        if len(worker_group) < 1 or not is_loopback(worker_group.execute_single(0, _node_address)):
            super().on_start(worker_group, backend_config)
            return
        import ray

        gpus = worker_group.get_resources_per_worker().get("GPU", 0)
        backend = backend_config.backend or ("nccl" if gpus > 0 else "gloo")
        world_size = len(worker_group)
        port = worker_group.execute_single(0, _serve_store, world_size, backend_config.timeout_s)
        ray.get([worker_group.execute_single_async(rank, join_group, backend, rank, world_size, port,
                                                   backend_config.timeout_s)
                 for rank in range(world_size)])


def is_loopback(address: str) -> bool:
    """Whether `address` (an IP, perhaps IPv4 mapped into IPv6) is a loopback address."""
    try:
        ip = ipaddress.ip_address(address.strip("[]").split("%")[0])
    except ValueError:
        return address == "localhost"
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def _node_address() -> str:
    import ray

    return ray.util.get_node_ip_address()


def on_loopback() -> bool:
    """Whether this process's Ray node has a loopback address: a cluster of this machine only (the
    embedded one), which no other node can join."""
    return is_loopback(_node_address())


def loopback_interface() -> str:
    """The name of the interface that holds 127.0.0.1 ("lo" on Linux)."""
    try:
        import psutil  # Ray's own copy where the environment has none
    except ImportError:
        return "lo"
    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return "lo"


def _serve_store(world_size: int, timeout_s: float) -> int:
    """On rank 0: the rendezvous store, listening on 127.0.0.1 only; returns its port."""
    import torch.distributed as dist

    global _STORE
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(max(128, world_size))
    port = sock.getsockname()[1]
    # TCPStore owns (and closes) the descriptor from here on.
    _STORE = dist.TCPStore("127.0.0.1", port, world_size, True, timedelta(seconds=timeout_s),
                           wait_for_workers=False, master_listen_fd=sock.detach())
    return port


def join_group(backend: str, rank: int, world_size: int, port: int, timeout_s: float) -> None:
    """Join the default process group through the store on 127.0.0.1:`port`, gloo's and NCCL's own
    connections on the loopback interface."""
    import ray.train
    import torch.distributed as dist

    global _STORE
    interface = loopback_interface()
    os.environ.update({"GLOO_SOCKET_IFNAME": interface, "NCCL_SOCKET_IFNAME": interface,
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    context = ray.train.get_context()  # what torchrun would set, as Ray's own setup does
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(context.get_local_rank()),
                       "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
                       "NODE_RANK": str(context.get_node_rank())})
    if "nccl" in backend and "TORCH_NCCL_BLOCKING_WAIT" not in os.environ:
        # A collective that times out fails the worker instead of hanging it (Ray's setup does the same).
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = timedelta(seconds=timeout_s)
    store = _STORE if rank == 0 else dist.TCPStore("127.0.0.1", port, world_size, False, timeout)
    _STORE = None  # the process group holds it; destroying the group closes the server
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
