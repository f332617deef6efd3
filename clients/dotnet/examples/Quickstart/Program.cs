// dotnet run -- http://127.0.0.1:50051 "$(roomsecrets token --data-dir .data --identity alice --room demo)"
using System.Text;
using RoomSecrets.Client;

using var client = new SecretsClient(args[0], args[1]);
await client.SetSecretAsync(Encoding.UTF8.GetBytes("sk-123"), secretId: "openai", type: "text/plain");
var secret = await client.GetSecretAsync(secretId: "openai");
Console.WriteLine(secret is null ? "missing" : $"{secret.Info.Id}: {secret.Data.Length} bytes");
Console.WriteLine(await client.GetSecretAsync(secretId: "nope") is null ? "nope: null, as expected" : "unexpected");
foreach (var info in await client.ListSecretsAsync()) Console.WriteLine($"{info.Id} {info.Type}");
