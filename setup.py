"""Build hook: generate store/grpc/gen (protobuf code for the gRPC Content API) at build
time, so wheels and ``pip install .`` ship it. Everything else is in pyproject.toml."""

from __future__ import annotations

import importlib.util
import os

from setuptools import setup  # type: ignore[import-untyped]
from setuptools.command.build_py import build_py  # type: ignore[import-untyped]


class build_py_with_protos(build_py):  # type: ignore[misc]  # noqa: N801
    def run(self) -> None:
        super().run()
        here = os.path.dirname(os.path.abspath(__file__))
        # load codegen.py by path: importing the package would need it installed
        spec = importlib.util.spec_from_file_location(
            "_contentfs_codegen", os.path.join(here, "store", "grpc", "codegen.py")
        )
        assert spec is not None and spec.loader is not None
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        if self.editable_mode:
            target = os.path.join(here, "store", "grpc", "gen")
        else:
            target = os.path.join(self.build_lib, "store", "grpc", "gen")
        codegen.generate(target, codegen.PROTO_DIR)


setup(cmdclass={"build_py": build_py_with_protos})
