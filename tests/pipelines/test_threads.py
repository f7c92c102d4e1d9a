"""One pipeline shared by threads, as a web server shares it: loaded in one thread and used from others (MLX streams
belong to the thread that made them), generations one at a time, each thread getting its own images."""

import threading

import mlx.core as mx
import numpy as np

import helpers  # noqa: F401
from mlx_diffusion import load_pipeline

KW = dict(steps=2, width=32, height=32, output_type="np")


def _in_threads(jobs):
    """Run each job in its own thread, all at once; their results (or exceptions), in order."""
    out = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def work(i, job):
        try:
            start.wait()
            out[i] = job()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            out[i] = e
        finally:
            mx.clear_streams()  # a thread's last MLX call (see Pipeline's docstring)

    threads = [threading.Thread(target=work, args=(i, job)) for i, job in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    return out


def test_a_pipeline_made_in_one_thread_serves_four(flux_dev):
    pipe = load_pipeline(flux_dev[2], progress=False)
    seeds = [1, 2, 3, 4]
    alone = [pipe.generate("a red fox", seed=s, guidance=2.0, **KW) for s in seeds]
    results = _in_threads([lambda s=s: pipe.generate_many("a red fox", seeds=[s], guidance=2.0, **KW)[0]
                           for s in seeds])
    for s, want, got in zip(seeds, alone, results):
        assert not isinstance(got, BaseException), got
        assert got.settings.seed == s and np.array_equal(got.image, want)


def test_the_builtin_model_loaded_in_a_worker_thread(tmp_path):
    made = _in_threads([lambda: load_pipeline(progress=False)])[0]
    assert not isinstance(made, BaseException), made
    want = load_pipeline(progress=False).generate("a red circle", seed=7, output_type="np")
    got = _in_threads([lambda: made.generate("a red circle", seed=7, output_type="np")] * 2)
    assert all(np.array_equal(g, want) for g in got), got
