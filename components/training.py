"""What the two training stages (train_head, finetune) share: a seeded, deterministic TensorFlow.

Training is bit-reproducible: the same inputs and params give the same weights,
byte for byte (`outputs.save_keras` keeps the saved file's bytes a function of
the weights). That takes a seed for every random draw (weights, shuffling,
augmentation, dropout) and TensorFlow's deterministic kernels, which on this
CPU cost little (`benchmarks/finetune_epoch.py` measures an epoch both ways).
"""

from __future__ import annotations


def make_deterministic(seed: int) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and make TensorFlow's ops deterministic.

    Op determinism is a process-wide TensorFlow setting (there is no scoped form);
    each stage runs in its own process.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
