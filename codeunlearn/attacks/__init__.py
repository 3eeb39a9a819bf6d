"""Attacks on a deployed unlearned model: does the forgotten knowledge come back (re-quantization, relearning)?"""
