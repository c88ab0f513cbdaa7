"""Checkpoint weight formats that qbench reads and writes itself (pure torch, any device).

:mod:`qbench.formats.chatglm` is ChatGLM2/3's int4/int8 per-row weight format. Import the submodule you need;
this package re-exports nothing so that importing it stays cheap.
"""
