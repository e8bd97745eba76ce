"""`tandem serve`: lands with the gateway issue."""


def add_arguments(parser) -> None:
    parser.add_argument("--model", help="model folder to serve")


def run(args) -> int:
    print("tandem serve: not yet — the gateway and the services land in their own issues.")
    return 1
