"""The portal: a local web page to watch and operate the service (`rolehost portal`).

A separate process and a client of the control API, as the CLI is: it adds no operation
of its own, and the controller carries none of it. guard.py decides who may talk to it,
source.py what it knows, actions.py what its buttons do, pages.py and timeline.py what
it shows, app.py serves it all.
"""
