/// Client of the roomsecrets gRPC service. Run `./gen.sh` first: the generated stubs under
/// lib/src/gen are not committed (see README.md).
library;

export 'src/secrets_client.dart';
