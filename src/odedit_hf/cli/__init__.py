"""The ``odedit-hf`` command line tool."""
