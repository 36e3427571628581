"""``import ckptstore`` needs only numpy; a missing torch is an ImportError naming the extra."""

from conftest import run_py


def test_import_and_numpy_round_trip_without_torch(tmp_path):
    r = run_py("""
        import sys
        sys.modules["torch"] = None          # import torch now fails
        import numpy as np, ckptstore as cs
        s = cs.Store(sys.argv[1])
        cs.save(s, {"w": np.arange(4, dtype=np.float32), "n": 3}, step=1)
        back = cs.load(s, framework="numpy")
        assert back["w"].tolist() == [0, 1, 2, 3] and back["n"] == 3
        assert isinstance(cs.load(s)["w"], np.ndarray)   # as saved: numpy, no torch needed
        try:
            cs.load(s, framework="torch")
        except ImportError as e:
            print("IMPORTERROR", e)
        assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
    """, str(tmp_path / "s"))
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "ckptstore[torch]" in r.stdout


def test_package_ships_type_information():
    import importlib.resources
    files = importlib.resources.files("ckptstore")
    assert files.joinpath("py.typed").is_file()
    assert files.joinpath("_native.pyi").is_file()


def test_mindspore_module_without_mindspore_names_the_install():
    r = run_py("""
        import sys
        sys.modules["mindspore"] = None      # import mindspore now fails
        import ckptstore
        try:
            ckptstore.mindspore
        except ImportError as e:
            print("IMPORTERROR", e)
    """)
    assert r.returncode == 0, r.stderr
    assert "IMPORTERROR" in r.stdout and "pip install mindspore" in r.stdout
