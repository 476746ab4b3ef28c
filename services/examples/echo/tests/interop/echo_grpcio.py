"""keel.example.v1.Echo in Python grpcio, the other gRPC implementation of the gzip interoperability test.

    echo_grpcio.py serve           serves Echo on 127.0.0.1 (a free port, printed first), answering gzip-compressed
    echo_grpcio.py call HOST:PORT  calls Echo with gzip-compressed requests and prints the reply's message

The generated modules (echo_pb2, echo_pb2_grpc) are expected on sys.path (the test generates them).
"""

import sys
from concurrent import futures

import grpc

from keel.example.v1 import echo_pb2, echo_pb2_grpc


class Echo(echo_pb2_grpc.EchoServicer):
    def Echo(self, request, context):
        return echo_pb2.EchoResponse(message=request.message, instance_id="grpcio")


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), compression=grpc.Compression.Gzip)
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(target):
    with grpc.insecure_channel(target, compression=grpc.Compression.Gzip) as channel:
        reply = echo_pb2_grpc.EchoStub(channel).Echo(echo_pb2.EchoRequest(message="from grpcio " + "x" * 2000), timeout=10)
        print(reply.message[:16])


if __name__ == "__main__":
    serve() if sys.argv[1] == "serve" else call(sys.argv[2])
