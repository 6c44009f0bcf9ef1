"""Shared helpers for the training-engine tests: a quick digits schedule and a CLI runner."""
from __future__ import annotations

import os
import subprocess
import sys
import zlib

import pytest
import torch

# The numba kernels compiled for one thread: half the compile time, which is most of the time of the
# kernel tests. test_numba_threads.py shows the kernels compiled for all threads (the default) give the
# same bits.
os.environ.setdefault("TETSNN_NUMBA_PARALLEL", "0")

# a few optimizer steps per epoch: enough to exercise every path of the engine in seconds
QUICK = ["--limit-train", "256", "--limit-test", "128", "--batch-size", "64"]

# the environment of the CLI subprocesses that test the engine, not the kernels: the torch-op kernels
# run, so that no process spends its first seconds compiling the numba kernels
CHILD_ENV = {"TETSNN_NUMBA": "0"}


def run_cli(*args, cwd=None, timeout=600, module="tetsnn", env=None):
    """Run ``python -m tetsnn ARGS`` (or another module) in a fresh process; output is not a terminal."""
    full_env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def stable_seed(*parts) -> int:
    """A seed from test parameters, the same in every process (``hash`` of a string is salted per
    process, so a seed taken from it changes the test's input from run to run)."""
    return zlib.crc32(repr(parts).encode()) % 1000


# float32 gradients of a neuron through T steps, against a loop that rounds in another order: each
# differs from the float64 result by a few ulp of the largest gradient (measured on 48,000 random cases:
# at most 8.4e-7 of it between the two), so the bound scales with that largest gradient
GRAD_TOL = {torch.float32: 4e-6, torch.float64: 1e-10}


def assert_grads_close(got, want, tol):
    """``got`` within ``tol`` times the largest ``want`` (at least 1) of ``want``, element by element."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=0, atol=tol * scale)


@pytest.fixture
def quick_args():
    return list(QUICK)


# Grids and model-zoo sweeps whose cases take seconds each and minutes together: marked slow, except
# the light cases named here (substrings of the test id), which keep each sweep in the fast subset
# (``pytest -m "not slow"``). The torchrun, AOT-compile, gpu_check and training-run tests carry the
# mark themselves.
SLOW_SWEEPS = {
    "test_bn_fused.py::test_matches_unfused_every_neuron_option": (),
    "test_bn_fused.py::test_registry_models_match_unfused": ("digits_snn",),
    "test_bn_fused.py::test_rebuild_follows_the_kernel_torch_dispatches_to": (),
    "test_bn_fused.py::test_numba_backward_equals_batch_norm_rerun": (),
    "test_backends.py::test_every_T_and_dtype": ("[zif-hard-dtype0-",),
    "test_backends.py::test_matches_loop": ("[zif-skw0-False-hard-",),
    "test_backends.py::test_channels_last_model_gradients_match_loop": (),
    "test_models.py::test_every_model_forward_backward": ("[digits_snn]", "[vggsnn]"),
    "test_nir_import.py::test_export_then_import_computes_what_the_model_computes": ("[digits_snn", "[vggsnn"),
    "test_nir.py::test_registry_models_export": ("[digits_snn", "[vggsnn"),
    "test_neuron.py::test_neuron_matches_loop": ("[lif-False-hard-zif-1.0-dtype1", "[lif-True-soft-atan-2.0-dtype1",
                                                 "[if-False-soft-sigmoid-4.0-dtype1", "[lif-False-hard-custom-None-dtype1"),
    "test_nir_simulators.py::test_simulator_reproduces_tetsnn": ("lif_net]", "if_net]", "digits_snn]"),
    "test_bn_fused.py::test_bf16_autocast_and_channels_last": (),
    "test_backends.py::test_exact_ties": ("[hard-",),
    "test_compile.py::test_compiled_first_step_matches_eager": (),
    "test_compact.py::test_torch_compile_matches_eager": (),
    "test_neuron_zoo.py::test_batchnorm_fusion_on_and_off": ("[triton-plif-kw0",),
    "test_neuron_zoo.py::test_against_spikingjelly_every_path": ("[3-lif]",),
    "test_norm.py::test_models_fused_equal_unfused": ("digits_snn",),
    "test_norm.py::test_models_norm_option_and_state_dict_keys": ("digits_snn",),
    "test_norm.py::test_layer_with_lif_equals_spikingjelly": ("[False-",),
    "test_frameworks.py::test_conv_networks_equal_outputs_and_gradients": (),
    "test_ilif.py::test_against_spikingjelly_every_path": ("[3-0.8-False]",),
    "test_psn.py::test_models_with_psn": ("digits_snn",),
    "test_psn.py::test_equals_spikingjelly_float64": ("torch-ops",),
    "test_bn_fused.py::test_running_statistics_over_steps": (),
    "test_ilif.py::test_models_take_ilif_and_keep_bits_for_its_counts": (),
    "test_backends.py::test_eager_path_equals_the_op": (),
    "test_augment.py::test_training_mixes_until_the_off_epoch_and_resumes_bit_identically": (),
    "test_bn_fused.py::test_frozen_parameters_and_no_affine": (),
    "test_memory.py::test_registry_models_min_equals_default": ("[vggsnn-", "[digits_snn-"),
    "test_neuron_zoo.py::test_decay_input_paths_equal_the_loop": (),
    "test_ilif.py::test_float32_fused_equals_loop": (),
    # subprocesses: a fresh interpreter imports torch for each
    "test_backends.py::test_numba_can_be_turned_off_by_the_environment": (),
    "test_lean_imports.py::test_import_and_train_step_without_optional_packages": (),
    "test_lean_imports.py::test_export_cli_names_the_missing_package": (),
    "test_allocator.py::test_glibc_default_keeps_the_block_in_the_heap_and_the_fixed_threshold_mmaps_it": (),
    "test_allocator.py::test_training_applies_the_config_key_first_and_leaves_glibc_alone_at_0": (),
    "test_allocator.py::test_the_users_environment_setting_wins": (),
    "test_cli.py::test_version_and_did_you_mean": (),
    "test_nir.py::test_tetsnn_imports_without_nir": (),
    "test_neuron_zoo.py::test_batchnorm_fused_equals_the_loop": ("-triton]",),
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        name = item.nodeid.split("/")[-1]
        for test, keep in SLOW_SWEEPS.items():
            if name.split("[")[0] == test and not any(k in name for k in keep):
                item.add_marker(pytest.mark.slow)
