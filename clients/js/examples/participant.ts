/**
 * A JS participant for the cross-language tests (tests/test_cross_language.py), and an example.
 *
 *   node dist/examples/participant.js ask   BASE_URL TOKEN FROM URL   # prints the value, or CODE: message on stderr
 *   node dist/examples/participant.js serve BASE_URL TOKEN             # answers requests until stdin closes
 *
 * `serve` provides "js-secret-for:<url>", and rejects URLs containing "deny" with "js says no".
 * It prints "ready" once its WatchRequests stream is live.
 */
import { Code, ConnectError, RejectRequest, SecretsClient } from "../src/index.js";

async function main(argv: string[]): Promise<number> {
  const [mode, baseUrl, token, ...rest] = argv;
  if (mode === "ask") {
    const [from, url] = rest;
    const client = new SecretsClient({ baseUrl, token });
    try {
      const value = await client.requestSecret(from, url, { timeout: 20 });
      process.stdout.write(new TextDecoder().decode(value) + "\n");
      return 0;
    } catch (error) {
      const err = ConnectError.from(error);
      process.stderr.write(`${Code[err.code]}: ${err.rawMessage}\n`);
      return 1;
    } finally {
      client.close();
    }
  }
  if (mode === "serve") {
    const client = new SecretsClient({
      baseUrl,
      token,
      secretRequestHandler: (request) => {
        if (request.url.includes("deny")) throw new RejectRequest("js says no");
        return `js-secret-for:${request.url}`;
      },
    });
    await client.start();
    process.stdout.write("ready\n");
    await new Promise<void>((resolve) => process.stdin.on("end", resolve).resume());
    await client.close();
    return 0;
  }
  process.stderr.write("usage: participant.js ask|serve BASE_URL TOKEN [FROM URL]\n");
  return 2;
}

process.exitCode = await main(process.argv.slice(2));
