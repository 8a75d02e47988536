"""One process of a multi-host run on one CPU machine (``tests/models/test_model_sharding.py`` starts several):
``python -m tests.models.multihost_worker PROCESS_ID PROCESSES PORT CHECKPOINT OUT``. Each process owns
``8 / PROCESSES`` host devices; together they hold an EP 4 x TP 2 mesh, load the checkpoint per shard (each its
own devices' shards), and write the logits and greedy tokens every process sees to ``OUT_<id>.npz``."""

import sys

import jax


def main(process_id: int, processes: int, port: str, checkpoint: str, out: str) -> None:
    jax.config.update("jax_num_cpu_devices", 8 // processes)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=processes, process_id=process_id)
    import jax.numpy as jnp
    import numpy as np

    from quarkmoe_jax.models import from_pretrained
    from quarkmoe_jax.moe.sharding import moe_mesh

    assert len(jax.devices()) == 8 and len(jax.local_devices()) == 8 // processes
    model = from_pretrained(checkpoint, dtype=jnp.float32, mesh=moe_mesh(data=1, expert=4, tensor=2))
    ids = np.load(f"{out}_ids.npy")
    np.savez(f"{out}_{process_id}.npz", logits=np.asarray(model(ids)), tokens=model.generate(ids, 4))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), *sys.argv[3:])
