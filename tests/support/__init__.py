"""What the tests share: role sources, a service's files, the network, the command line.

Tests import from here (`from support.net import free_port`), never from one another
or from a conftest.py: pyproject.toml puts tests/ on pytest's `pythonpath`, so this
package is found from tests/, tests/faults/ and samples/*/ alike, in any import mode.
Fixtures stay fixtures, in tests/conftest.py."""
