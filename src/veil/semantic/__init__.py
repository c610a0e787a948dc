"""Semantic protection: train remotely on decoy classes (see :mod:`veil.semantic.translator` and
:mod:`veil.semantic.pipeline`; the audit is :mod:`veil.audit.semantic`)."""

from veil.semantic.permutation import ClassPermutation, PermutationError
from veil.semantic.pipeline import ComposedClassifier, load_decoys, train_remote, write_decoys
from veil.semantic.translator import (
    SemanticError,
    Translator,
    TranslatorSettings,
    fit_translator,
    load_translator,
    save_translator,
)

__all__ = ["ClassPermutation", "ComposedClassifier", "PermutationError", "SemanticError", "Translator",
           "TranslatorSettings", "fit_translator", "load_decoys", "load_translator", "save_translator",
           "train_remote", "write_decoys"]
