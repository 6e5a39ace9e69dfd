"""Builds the native fast path, mtckpt._native; metadata lives in pyproject.toml.

The extension is optional: without a C compiler (or Python headers) the install goes on
without it, setuptools says so, and mtckpt runs on its numpy twin with one warning at
first use (MTCKPT_NATIVE=require turns that into an error)."""

from setuptools import Extension, setup

native = Extension(
    "mtckpt._native",
    sources=["native/module.c", "native/crc32c.c", "native/copy.c", "native/fileio.c",
             "native/gf256.c"],
    depends=["native/crc32c.h", "native/copy.h", "native/fileio.h", "native/gf256.h"],
    include_dirs=["native"],
    extra_compile_args=["-O3", "-std=c11", "-Wall", "-Wextra", "-fvisibility=hidden"],
    extra_link_args=["-pthread"],
    optional=True,
)

setup(ext_modules=[native])
