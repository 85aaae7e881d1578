"""Feature keys and the TFRecord schema shared by convert, extract, training and serving."""

from __future__ import annotations

import tensorflow as tf

IMAGE = "image"  # encoded image bytes (JPEG, or PNG for normalised non-JPEG sources)
LABEL = "label"  # int64 index into the label vocabulary
LABEL_NAME = "label_name"  # the class name
ID = "id"  # the manifest id (first 20 hex digits of the SHA-256 of the normalised pixels)
FILE = "file"  # convert's input only: the image's path relative to the download folder
SPLIT = "split"  # convert's input only: train, val or test

LABEL_VOCABULARY = "label"  # name of the vocabulary file in the transform graph's assets

FEATURES = "features"  # extract's output: the conv base's features, flattened float32

RAW_KEYS = (LABEL_NAME, ID, FILE, SPLIT)  # what convert feeds tf.Transform (no pixels: small and fast)
RECORD_KEYS = (IMAGE, LABEL, LABEL_NAME, ID)  # what each TFRecord holds


def record_feature_spec():
    """The `tf.io.parse_example` spec of the convert stage's TFRecords."""
    return {
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        LABEL_NAME: tf.io.FixedLenFeature([], tf.string),
        ID: tf.io.FixedLenFeature([], tf.string),
    }


def raw_feature_spec():
    return {key: tf.io.FixedLenFeature([], tf.string) for key in RAW_KEYS}


def features_feature_spec(size: int):
    """The `tf.io.parse_example` spec of the extract stage's feature records."""
    return {
        ID: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
        FEATURES: tf.io.FixedLenFeature([size], tf.float32),
    }
