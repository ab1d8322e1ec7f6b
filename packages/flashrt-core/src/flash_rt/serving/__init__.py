"""Policy servers: ``flashrt serve``, openpi's websocket protocol (docs/serving.md).

    openpi_server  PolicyServer / serve(): the websocket server, one inference worker
    msgpack_numpy  openpi's msgpack + ndarray wire encoding (nothing unpickled)
    layouts        LIBERO / DROID / ALOHA / generic observations -> predict(images, prompt, state)
    cli            add_serve_parser(subparsers) for the ``flashrt`` command

Importing this package imports neither websockets nor msgpack; the modules do (the "serve" extra).
"""
