module lark-ticketd-sdk-example

go 1.21

require github.com/larksuite/oapi-sdk-go/v3 v3.2.2
