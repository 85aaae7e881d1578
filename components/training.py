"""What the two training stages (train_head, finetune) share: a seeded, deterministic TensorFlow.

Training is bit-reproducible: the same inputs and params give the same weights,
byte for byte (`outputs.save_keras` keeps the saved file's bytes a function of
the weights). That takes a seed for every random draw (weights, shuffling,
augmentation, dropout) and TensorFlow's deterministic kernels. On this CPU
they cost a head epoch nothing and a fine-tuning epoch 14-19%
(`benchmarks/determinism_cost.py`), so finetune has a `deterministic` param.
"""

from __future__ import annotations


def make_deterministic(seed: int, ops: bool = True) -> None:
    """Seed Python, NumPy, TensorFlow and Keras, and (with `ops`) make TensorFlow's ops deterministic.

    Op determinism is a process-wide TensorFlow setting (there is no scoped form);
    each stage runs in its own process.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if ops:
        tf.config.experimental.enable_op_determinism()
