// Hand-written wrapper (not generated) over the stubs ./gen.sh generates into lib/src/gen.
import 'dart:convert';
import 'dart:typed_data';

import 'package:grpc/grpc.dart';

import 'gen/roomsecrets/v1/room_secrets.pbgrpc.dart' as pb;

/// A secret's value with its name and MIME type (the reference SDK's FileContent).
class FileContent {
  FileContent(this.data, this.name, this.mimeType);
  final Uint8List data;
  final String name;
  final String mimeType;
}

/// The room Secrets API with the reference SDK's Dart names. Errors are [GrpcError]s carrying
/// the gRPC status code; [getSecret] returns null when the secret does not exist.
class SecretsClient {
  SecretsClient(String host, int port, String token, {bool tls = false})
      : _channel = ClientChannel(host,
            port: port,
            options: ChannelOptions(
                credentials: tls ? const ChannelCredentials.secure() : const ChannelCredentials.insecure())) {
    _stub = pb.RoomSecretsClient(_channel, options: CallOptions(metadata: {'authorization': 'Bearer $token'}));
  }

  final ClientChannel _channel;
  late final pb.RoomSecretsClient _stub;

  Future<List<pb.SecretInfo>> listSecrets() async {
    final out = <pb.SecretInfo>[];
    var page = '';
    do {
      final reply = await _stub.listSecrets(pb.ListSecretsRequest(pageToken: page));
      out.addAll(reply.secrets);
      page = reply.nextPageToken;
    } while (page.isNotEmpty);
    return out;
  }

  Future<pb.SecretInfo> setSecret(List<int> data,
      {String? secretId, String? type, String? name, String? delegatedTo, String? forIdentity}) async {
    final reply = await _stub.setSecret(pb.SetSecretRequest(
        secretId: secretId, type: type, name: name, data: data, delegatedTo: delegatedTo, forIdentity: forIdentity));
    return reply.secret;
  }

  /// The secret, or null when it does not exist.
  Future<FileContent?> getSecret({String? secretId, String? type, String? name, String? delegatedTo}) async {
    try {
      final reply = await _stub.getSecret(
          pb.GetSecretRequest(secretId: secretId, type: type, name: name, delegatedTo: delegatedTo));
      return FileContent(Uint8List.fromList(reply.data), reply.secret.name, reply.secret.type);
    } on GrpcError catch (e) {
      if (e.code == StatusCode.notFound) return null;
      rethrow;
    }
  }

  Future<void> deleteSecret(String secretId, {String? delegatedTo}) =>
      _stub.deleteSecret(pb.DeleteSecretRequest(secretId: secretId, delegatedTo: delegatedTo));

  Future<Uint8List> requestSecret(String fromParticipantId, String url,
      {String type = 'application/octet-stream', int timeout = 300, String? delegateTo}) async {
    final reply = await _stub.requestSecret(
        pb.RequestSecretRequest(
            fromParticipantId: fromParticipantId, url: url, type: type, timeout: timeout, delegateTo: delegateTo),
        options: CallOptions(timeout: Duration(seconds: timeout + 10)));
    return Uint8List.fromList(reply.data);
  }

  Future<void> provideSecret(String requestId, List<int> data) =>
      _stub.provideSecret(pb.ProvideSecretRequest(requestId: requestId, data: data));

  Future<void> rejectSecret(String requestId, String error) =>
      _stub.rejectSecret(pb.RejectSecretRequest(requestId: requestId, error: error));

  /// Answers inbound secret requests with [handler] until the returned subscription is cancelled;
  /// a handler that throws rejects the request with the error's text.
  Stream<void> serveSecretRequests(Future<List<int>> Function(pb.SecretRequest request) handler) async* {
    await for (final event in _stub.watchRequests(pb.WatchRequestsRequest())) {
      if (!event.hasSecretRequest()) continue;
      final request = event.secretRequest;
      try {
        await provideSecret(request.requestId, await handler(request));
      } on GrpcError {
        rethrow;
      } catch (e) {
        await rejectSecret(request.requestId, e.toString());
      }
      yield null;
    }
  }

  Future<void> close() => _channel.shutdown();
}

/// Convenience for text values.
List<int> utf8Bytes(String text) => utf8.encode(text);
