"""The scripts here run under mpiexec (tests/test_mpi.py launches them):
pytest neither collects nor imports them."""
collect_ignore_glob = ["*.py"]
