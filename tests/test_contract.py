"""The committed stubs are what grpcio-tools makes of the .proto."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_generated_stubs_match_the_proto(tmp_path):
    shutil.copytree(ROOT / "protos", tmp_path / "protos")
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--pyi_out=.",
                    "--grpc_python_out=.", "sieve/v1/sieve.proto"], cwd=tmp_path / "protos", check=True)
    for name in ("sieve_pb2.py", "sieve_pb2.pyi", "sieve_pb2_grpc.py"):
        generated = (tmp_path / "protos" / "sieve" / "v1" / name).read_text()
        assert generated == (ROOT / "protos" / "sieve" / "v1" / name).read_text(), f"{name} is stale: run protos/generate.sh"
