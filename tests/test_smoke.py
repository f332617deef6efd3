from roomsecrets.v1 import room_secrets_pb2 as pb

from .harness import Participants


def test_set_get_roundtrip(room: Participants) -> None:
    md = room.auth("alice")
    room.stub.SetSecret(pb.SetSecretRequest(secret_id="s1", data=b"hello", type="text/plain"), metadata=md)
    got = room.stub.GetSecret(pb.GetSecretRequest(secret_id="s1"), metadata=md)
    assert got.data == b"hello"
    assert got.secret.type == "text/plain"
