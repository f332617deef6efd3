using Google.Protobuf;
using Grpc.Core;
using Grpc.Net.Client;
using Pb = global::RoomSecrets.V1;

namespace RoomSecrets.Client;

/// <summary>Metadata of a stored secret; never its value.</summary>
public sealed record SecretInfo(
    string Id, string Type, string Name, string? DelegatedTo, string? DelegatedBy, string Etag, long Size);

/// <summary>A secret's value with its name and type (the reference SDK's FileContent).</summary>
public sealed record SecretContent(byte[] Data, string Name, string MimeType, SecretInfo Info);

/// <summary>
/// The room Secrets API of a roomsecrets server. Every call sends <c>authorization: Bearer
/// &lt;token&gt;</c>. Errors are <see cref="RpcException"/> with the gRPC <see cref="StatusCode"/>;
/// <see cref="GetSecretAsync"/> returns <c>null</c> when the secret does not exist.
/// </summary>
public sealed class SecretsClient : IDisposable
{
    private readonly GrpcChannel _channel;
    private readonly Pb.RoomSecrets.RoomSecretsClient _stub;

    /// <param name="address">e.g. <c>http://127.0.0.1:50051</c> (plaintext) or <c>https://secrets.example:443</c>.</param>
    /// <param name="token">the participant JWT.</param>
    public SecretsClient(string address, string token, GrpcChannelOptions? options = null)
    {
        var bearer = CallCredentials.FromInterceptor((_, metadata) =>
        {
            metadata.Add("authorization", $"Bearer {token}");
            return Task.CompletedTask;
        });
        options ??= new GrpcChannelOptions();
        var secure = address.StartsWith("https://", StringComparison.OrdinalIgnoreCase);
        options.Credentials = ChannelCredentials.Create(secure ? ChannelCredentials.SecureSsl : ChannelCredentials.Insecure, bearer);
        // Plaintext is meant for loopback development (the server refuses it elsewhere).
        options.UnsafeUseInsecureChannelCallCredentials = !secure;
        _channel = GrpcChannel.ForAddress(address, options);
        _stub = new Pb.RoomSecrets.RoomSecretsClient(_channel);
    }

    /// <summary>Every secret the caller owns in the room, and those delegated to it (all pages).</summary>
    public async Task<IReadOnlyList<SecretInfo>> ListSecretsAsync(CancellationToken cancel = default)
    {
        var all = new List<SecretInfo>();
        var page = "";
        do
        {
            var reply = await _stub.ListSecretsAsync(new Pb.ListSecretsRequest { PageToken = page }, cancellationToken: cancel);
            all.AddRange(reply.Secrets.Select(Info));
            page = reply.NextPageToken;
        } while (page != "");
        return all;
    }

    public async Task<bool> ExistsAsync(string secretId, string? delegatedTo = null, CancellationToken cancel = default) =>
        (await _stub.ExistsAsync(new Pb.ExistsRequest { SecretId = secretId, DelegatedTo = delegatedTo ?? "" }, cancellationToken: cancel)).Exists;

    public async Task<SecretInfo> SetSecretAsync(
        byte[] data, string? secretId = null, string? type = null, string? name = null,
        string? delegatedTo = null, string? forIdentity = null, string? etag = null, CancellationToken cancel = default)
    {
        var request = new Pb.SetSecretRequest
        {
            SecretId = secretId ?? "", Type = type ?? "", Name = name ?? "", Data = ByteString.CopyFrom(data),
            DelegatedTo = delegatedTo ?? "", ForIdentity = forIdentity ?? "", Etag = etag ?? "",
        };
        return Info((await _stub.SetSecretAsync(request, cancellationToken: cancel)).Secret);
    }

    /// <summary>The secret, or <c>null</c> when it does not exist.</summary>
    public async Task<SecretContent?> GetSecretAsync(
        string? secretId = null, string? type = null, string? name = null, string? delegatedTo = null,
        string? delegatedBy = null, CancellationToken cancel = default)
    {
        var request = new Pb.GetSecretRequest
        {
            SecretId = secretId ?? "", Type = type ?? "", Name = name ?? "",
            DelegatedTo = delegatedTo ?? "", DelegatedBy = delegatedBy ?? "",
        };
        try
        {
            var reply = await _stub.GetSecretAsync(request, cancellationToken: cancel);
            return new SecretContent(reply.Data.ToByteArray(), reply.Secret.Name, reply.Secret.Type, Info(reply.Secret));
        }
        catch (RpcException e) when (e.StatusCode == StatusCode.NotFound)
        {
            return null;
        }
    }

    public async Task DeleteSecretAsync(string secretId, string? delegatedTo = null, string? etag = null, CancellationToken cancel = default) =>
        await _stub.DeleteSecretAsync(new Pb.DeleteSecretRequest { SecretId = secretId, DelegatedTo = delegatedTo ?? "", Etag = etag ?? "" }, cancellationToken: cancel);

    /// <summary>Ask another participant for a secret; waits until provided, rejected or timed out.</summary>
    public async Task<byte[]> RequestSecretAsync(
        string fromParticipantId, string url, string type = "application/octet-stream", int timeoutSeconds = 300,
        string? delegateTo = null, CancellationToken cancel = default)
    {
        var request = new Pb.RequestSecretRequest
        {
            FromParticipantId = fromParticipantId, Url = url, Type = type, Timeout = timeoutSeconds, DelegateTo = delegateTo ?? "",
        };
        var reply = await _stub.RequestSecretAsync(request, deadline: DateTime.UtcNow.AddSeconds(timeoutSeconds + 10), cancellationToken: cancel);
        return reply.Data.ToByteArray();
    }

    public async Task ProvideSecretAsync(string requestId, byte[] data, CancellationToken cancel = default) =>
        await _stub.ProvideSecretAsync(new Pb.ProvideSecretRequest { RequestId = requestId, Data = ByteString.CopyFrom(data) }, cancellationToken: cancel);

    public async Task RejectSecretAsync(string requestId, string error, CancellationToken cancel = default) =>
        await _stub.RejectSecretAsync(new Pb.RejectSecretRequest { RequestId = requestId, Error = error }, cancellationToken: cancel);

    public async Task DeleteRequestedSecretAsync(string url, string type, string? delegatedTo = null, CancellationToken cancel = default) =>
        await _stub.DeleteRequestedSecretAsync(new Pb.DeleteRequestedSecretRequest { Url = url, Type = type, DelegatedTo = delegatedTo ?? "" }, cancellationToken: cancel);

    /// <summary>The stored OAuth access token (refreshed by the server when needed), or <c>null</c>.</summary>
    public async Task<string?> GetOfflineOAuthTokenAsync(string connector, string? delegatedTo = null, string? delegatedBy = null, CancellationToken cancel = default)
    {
        var request = new Pb.GetOfflineOAuthTokenRequest
        {
            Connector = new Pb.ConnectorRef { Name = connector }, DelegatedTo = delegatedTo ?? "", DelegatedBy = delegatedBy ?? "",
        };
        var reply = await _stub.GetOfflineOAuthTokenAsync(request, cancellationToken: cancel);
        return reply.HasAccessToken ? reply.AccessToken : null;
    }

    /// <summary>
    /// Answers inbound secret requests until <paramref name="cancel"/> fires: the handler's bytes
    /// are provided; an exception rejects the request with its message.
    /// </summary>
    public async Task ServeSecretRequestsAsync(Func<Pb.SecretRequest, Task<byte[]>> handler, CancellationToken cancel)
    {
        using var call = _stub.WatchRequests(new Pb.WatchRequestsRequest(), cancellationToken: cancel);
        await foreach (var ev in call.ResponseStream.ReadAllAsync(cancel))
        {
            if (ev.EventCase != Pb.WatchRequestsResponse.EventOneofCase.SecretRequest) continue;
            var request = ev.SecretRequest;
            try
            {
                await ProvideSecretAsync(request.RequestId, await handler(request), cancel);
            }
            catch (Exception e) when (e is not OperationCanceledException && e is not RpcException)
            {
                await RejectSecretAsync(request.RequestId, e.Message, cancel);
            }
        }
    }

    private static SecretInfo Info(Pb.SecretInfo s) => new(
        s.Id, s.Type, s.Name, s.DelegatedTo == "" ? null : s.DelegatedTo, s.DelegatedBy == "" ? null : s.DelegatedBy, s.Etag, s.Size);

    public void Dispose() => _channel.Dispose();
}
