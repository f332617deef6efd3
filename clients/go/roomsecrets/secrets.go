package roomsecrets

import (
	"context"
	"hash/crc32"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/roomsecrets/roomsecrets/clients/go/roomsecretsv1"
)

// DefaultType is the type of a secret or requested secret when none is given.
const DefaultType = "application/octet-stream"

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// checksum is the CRC32C of data, as the wire carries it.
func checksum(data []byte) int64 { return int64(crc32.Checksum(data, castagnoli)) }

// verified returns data if it matches its CRC32C, else a DATA_LOSS status error.
func verified(data []byte, sum int64, what string) ([]byte, error) {
	if checksum(data) != sum {
		return nil, status.Errorf(codes.DataLoss, "roomsecrets: %s: the received value does not match its CRC32C", what)
	}
	return data, nil
}

// SecretInfo is the metadata of a stored secret; it never carries the value.
type SecretInfo struct {
	// ID addresses the secret within its owner's secrets in the room.
	ID string
	// Type is a MIME type or kind (text/plain, git, application/octet-stream, ...).
	Type string
	// Name is a free-form name; (Type, Name) also address the secret.
	Name string
	// DelegatedTo is the identity allowed to use the secret on the owner's behalf, if any.
	DelegatedTo string
	// DelegatedBy is the owner's identity when another participant delegated the secret to the caller.
	DelegatedBy string
	// Etag is the version tag to pass back for check-and-set writes and deletes.
	Etag string
	// CRC32C is the CRC32C (Castagnoli) of the value.
	CRC32C uint32
	// Size is the length of the value in bytes.
	Size int64
	// UpdateTime is when the value was last written.
	UpdateTime time.Time
}

func secretInfo(m *pb.SecretInfo) SecretInfo {
	info := SecretInfo{
		ID:          m.GetId(),
		Type:        m.GetType(),
		Name:        m.GetName(),
		DelegatedTo: m.GetDelegatedTo(),
		DelegatedBy: m.GetDelegatedBy(),
		Etag:        m.GetEtag(),
		CRC32C:      uint32(m.GetDataCrc32C()),
		Size:        m.GetSize(),
	}
	info.UpdateTime = timeOf(m.GetUpdateTime())
	return info
}

// Secret is a secret's value with its metadata (the reference SDK's FileContent: data, name and
// MIME type, which is Type).
type Secret struct {
	SecretInfo
	// Data is the value, verified against its CRC32C.
	Data []byte
}

// ListSecrets returns every secret the caller owns in the room and those other participants
// delegated to it (marked by DelegatedBy), reading all pages. Never values.
func (c *Client) ListSecrets(ctx context.Context) ([]SecretInfo, error) {
	var out []SecretInfo
	pageToken := ""
	for {
		cctx, cancel, err := c.call(ctx)
		if err != nil {
			return nil, err
		}
		reply, err := c.stub.ListSecrets(cctx, &pb.ListSecretsRequest{PageToken: pageToken})
		cancel()
		if err != nil {
			return nil, err
		}
		for _, s := range reply.GetSecrets() {
			out = append(out, secretInfo(s))
		}
		pageToken = reply.GetNextPageToken()
		if pageToken == "" {
			return out, nil
		}
	}
}

// ExistsOptions qualifies [Client.Exists].
type ExistsOptions struct {
	// DelegatedTo names a secret delegated to this identity.
	DelegatedTo string
	// ForIdentity looks for a secret owned by this identity instead of the caller (room admin only).
	ForIdentity string
}

// Exists reports whether the secret exists, without reading it. opts may be nil.
func (c *Client) Exists(ctx context.Context, id string, opts *ExistsOptions) (bool, error) {
	if opts == nil {
		opts = &ExistsOptions{}
	}
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return false, err
	}
	defer cancel()
	reply, err := c.stub.Exists(ctx, &pb.ExistsRequest{SecretId: id, DelegatedTo: opts.DelegatedTo, ForIdentity: opts.ForIdentity})
	if err != nil {
		return false, err
	}
	return reply.GetExists(), nil
}

// SetSecretInput is what [Client.SetSecret] writes.
type SetSecretInput struct {
	// ID addresses the secret. When empty, (Type, Name) address it and a new secret gets a
	// server-assigned id.
	ID string
	// Type is a MIME type or kind; the server defaults it to application/octet-stream on create.
	Type string
	// Name is a free-form name.
	Name string
	// Data is the value (at most 1 MiB unless the server is configured otherwise).
	Data []byte
	// DelegatedTo names the identity allowed to use the secret on the owner's behalf.
	DelegatedTo string
	// ForIdentity stores the secret for this identity instead of the caller (room admin only).
	ForIdentity string
	// Etag, when set, makes the write succeed only if the secret is still at this version
	// (ABORTED otherwise, also when the secret does not exist).
	Etag string
}

// SetSecret creates or replaces a secret and returns its metadata. The value is sent with its
// CRC32C, which the server verifies.
func (c *Client) SetSecret(ctx context.Context, in SetSecretInput) (*SecretInfo, error) {
	data := in.Data
	if data == nil {
		data = []byte{}
	}
	sum := checksum(data)
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	reply, err := c.stub.SetSecret(ctx, &pb.SetSecretRequest{
		SecretId:    in.ID,
		Type:        in.Type,
		Name:        in.Name,
		Data:        data,
		DelegatedTo: in.DelegatedTo,
		ForIdentity: in.ForIdentity,
		Etag:        in.Etag,
		DataCrc32C:  &sum,
	})
	if err != nil {
		return nil, err
	}
	info := secretInfo(reply.GetSecret())
	return &info, nil
}

// GetSecretInput addresses a secret for [Client.GetSecretWith]: by ID, or by (Type, Name).
type GetSecretInput struct {
	// ID addresses the secret.
	ID string
	// Type and Name address the secret when ID is empty.
	Type string
	// Name, with Type, addresses the secret when ID is empty.
	Name string
	// DelegatedTo names a secret delegated to this identity.
	DelegatedTo string
	// DelegatedBy reads a secret another participant delegated to the caller: the owner's identity.
	DelegatedBy string
}

// GetSecret returns the secret with this id, or nil and a nil error when there is none.
func (c *Client) GetSecret(ctx context.Context, id string) (*Secret, error) {
	return c.GetSecretWith(ctx, GetSecretInput{ID: id})
}

// GetSecretWith returns the secret the input addresses, or nil and a nil error when there is
// none (the server's NOT_FOUND). The value is verified against its CRC32C (DATA_LOSS otherwise).
func (c *Client) GetSecretWith(ctx context.Context, in GetSecretInput) (*Secret, error) {
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return nil, err
	}
	defer cancel()
	reply, err := c.stub.GetSecret(ctx, &pb.GetSecretRequest{
		SecretId:    in.ID,
		Type:        in.Type,
		Name:        in.Name,
		DelegatedTo: in.DelegatedTo,
		DelegatedBy: in.DelegatedBy,
	})
	if status.Code(err) == codes.NotFound {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	info := secretInfo(reply.GetSecret())
	data, err := verified(reply.GetData(), reply.GetDataCrc32C(), "secret "+info.ID)
	if err != nil {
		return nil, err
	}
	return &Secret{SecretInfo: info, Data: data}, nil
}

// DeleteOptions qualifies [Client.DeleteSecret].
type DeleteOptions struct {
	// DelegatedTo names a delegated secret.
	DelegatedTo string
	// Etag, when set, deletes only if the secret is still at this version (ABORTED otherwise).
	Etag string
}

// DeleteSecret deletes a secret. opts may be nil.
func (c *Client) DeleteSecret(ctx context.Context, id string, opts *DeleteOptions) error {
	if opts == nil {
		opts = &DeleteOptions{}
	}
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	_, err = c.stub.DeleteSecret(ctx, &pb.DeleteSecretRequest{SecretId: id, DelegatedTo: opts.DelegatedTo, Etag: opts.Etag})
	return err
}

// DeleteRequestedSecret deletes a secret that was obtained through [Client.RequestSecret],
// looked up by (url, typ) and, when not empty, delegatedTo — e.g. to force a new prompt after a
// wrong password.
func (c *Client) DeleteRequestedSecret(ctx context.Context, url, typ, delegatedTo string) error {
	ctx, cancel, err := c.call(ctx)
	if err != nil {
		return err
	}
	defer cancel()
	_, err = c.stub.DeleteRequestedSecret(ctx, &pb.DeleteRequestedSecretRequest{Url: url, Type: typ, DelegatedTo: delegatedTo})
	return err
}
